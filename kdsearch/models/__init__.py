"""The networks: student ViTs on timm's layers (one positional encoding per class) and the
built-in teacher's CNN."""
