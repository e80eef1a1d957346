"""The special tokens of every tokenizer the platform trains, at ids 0, 1, 2, ...: BOS, EOS, PAD,
then the chat format's role tokens and its end-of-turn token (generalmodel.data.chat), reserved at
pretraining time so that a model trained here can be fine-tuned on conversations as it is."""

CHAT_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>", "end": "<|end|>"}
SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>", *CHAT_TOKENS.values())
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # the byte-level alphabet and the special tokens

# Coconut's continuous thoughts (generalmodel.post.coconut): not reserved; added to a model's
# tokenizer by the job that trains them. A prompt ends with START, each thought position holds
# THOUGHT (its input is a hidden state, not this token's embedding), END precedes the answer.
LATENT_TOKENS = {"start": "<|start-latent|>", "thought": "<|latent|>", "end": "<|end-latent|>"}

# Quiet-STaR's thoughts (generalmodel.post.quiet_star): added to a model's tokenizer by the job that
# trains them; a thought after every token is START, the thought's tokens, END.
THOUGHT_TOKENS = {"start": "<|startofthought|>", "end": "<|endofthought|>"}

# Tool use (generalmodel.data.chat): a tool's result is a turn of its own, TOOL; an assistant's
# call is CALL followed by {"name": ..., "arguments": {...}} as JSON, inside the assistant's turn.
# Not reserved; added to a model's tokenizer by the SFT job when its data use tools (data.tools).
TOOL_TOKENS = {"tool": "<|tool|>", "call": "<|tool_call|>"}
