"""toolkit: fine-tune gpt-oss (or any chat LM) to translate between the languages of a parallel corpus.

`import toolkit` is cheap: no torch, no transformers. Each stage lives in its own module.
"""

__version__ = "0.1.0"
