"""transgqla: convert Hugging Face GQA checkpoints into GQLA (Group-Query Latent Attention)."""

__version__ = "0.1.0"
