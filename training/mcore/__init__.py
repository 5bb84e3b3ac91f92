"""megatron-core (0.16) building blocks for a future `engine=megatron`: the Qwen-VL text decoder on megatron's
tensor-parallel layers (model.py), HF <-> megatron weight conversion with TP resharding (convert.py), and what it
takes to run megatron-core on a CPU-only machine (shim.py). Nothing here is wired into training yet."""
