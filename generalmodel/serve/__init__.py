"""Serving a registered model: an OpenAI-compatible Ray Serve application (`app`) over the batched
decoding engine (generalmodel.infer.engine), and its wire format (`protocol`)."""
