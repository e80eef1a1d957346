"""The special tokens of every tokenizer the platform trains, at ids 0, 1, 2, ...: BOS, EOS, PAD,
then the chat format's role tokens and its end-of-turn token (generalmodel.data.chat), reserved at
pretraining time so that a model trained here can be fine-tuned on conversations as it is."""

CHAT_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>", "end": "<|end|>"}
SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>", *CHAT_TOKENS.values())
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # the byte-level alphabet and the special tokens
