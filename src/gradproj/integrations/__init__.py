"""Integrations with other training stacks (Hugging Face ``transformers.Trainer``)."""
