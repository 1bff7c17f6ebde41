"""The built-in demo model's world: scene generator, builder, pretraining, scoring and the style-set maker."""
