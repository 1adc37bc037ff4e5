"""Stage-1 MaskFormer, its matcher and losses, and the pooled regression head: tensors in, tensors out."""
