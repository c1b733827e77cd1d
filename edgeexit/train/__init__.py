"""The training side (needs the `[train]` extra): backbones, cut points, exit heads, losses,
placement, methods, model assembly, data loading and the trainer. Writes model.pt."""
