"""Mesh sharding for dsjax: mesh construction and the logical-axis -> mesh-axis rules."""
