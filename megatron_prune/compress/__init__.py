"""`compress`: one resumable job from an HF model to a smaller, recovered HF model, made of the CLI's own stages."""
