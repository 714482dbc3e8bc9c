"""Captioned image data: the CaptionedSplit contract, the built-in scenes dataset and loaders for user formats."""
