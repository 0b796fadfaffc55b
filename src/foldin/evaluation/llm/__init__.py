"""The llm suite: SmolLM2-135M-Instruct, the text tasks asked as instructions, LoRA adapters."""
