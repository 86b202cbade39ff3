"""MELO block-LoRA model editing as a library (arXiv 2312.11795): no Kafka, Redis or HTTP here."""
