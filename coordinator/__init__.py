"""The coordinator: round lifecycle, upload verification, durable storage, aggregation, pricing, settlement."""
