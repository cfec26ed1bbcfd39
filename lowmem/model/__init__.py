"""What prepare() does to a network: Int8Linear, per-architecture adapters, surgery (swapping linears), and the
list of trainable parameters with the update each one gets."""
