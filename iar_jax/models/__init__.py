"""The AR models (LlamaGen GPT, IAR2 and its local-context head) and the model families on them."""
