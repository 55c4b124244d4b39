"""DiM3: Direction- and Magnitude-aware Multilingual Multimodal merging (arXiv 2605.12960).

Gives a vision-language model the languages of a multilingual fine-tune of its base LLM, without
training, by composing the two residual updates column by column.
"""

__version__ = "0.1.0"
