"""Torch-free pieces both sides use: settings, assets, chat-template CoT switching, decision parsing, the
refusal judge, the progress protocol and the OpenAI error format."""
