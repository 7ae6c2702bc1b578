"""Constants shared with vLLM's conventions."""

PAD_SLOT_ID = -1
"""Cache index of a padded batch entry: its state rows are neither read nor written (vLLM's value)."""
