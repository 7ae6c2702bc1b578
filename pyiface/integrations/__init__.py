"""Run other projects' models on this package's ops: HF transformers' Mamba mixers
(:mod:`pyiface.integrations.transformers`) and peft's mixed-adapter LoRA batches
(:mod:`pyiface.integrations.peft`).

Both are optional (``pip install iface-kernels[hf]``): this package imports neither transformers
nor peft; only importing one of the two submodules does.
"""
