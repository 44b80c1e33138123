"""dpfed: differentially private federated fine-tuning with Fed-SB (LoRA-SB)."""

__version__ = "0.1.0"
