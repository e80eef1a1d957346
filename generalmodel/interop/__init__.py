"""Our models in other ecosystems' formats: Hugging Face `transformers` directories (`hf`)."""
