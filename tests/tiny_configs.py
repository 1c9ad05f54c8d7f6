"""Tiny configurations of every backbone for fast cross-cutting tests (Hub round trips, CLI, reduction)."""

TINY_CONFIGS = {
    "vmamba": dict(dims=[8, 16, 32, 64], depths=[1, 1, 2, 1], num_labels=10, image_size=32),
    "plainmamba": dict(hidden_size=8, num_hidden_layers=2, num_stem_convs=1, stem_channels=8, d_state=4,
                       layers_with_dwconv=[0], num_labels=5, image_size=32),
    "groupmamba": dict(embed_dims=[16, 24, 32, 40], depths=[1, 2, 1, 1], mlp_ratios=[2, 2, 3, 2], stem_hidden_dim=8,
                       num_labels=5, image_size=32),
    "vim": dict(image_size=32, patch_size=8, stride=8, hidden_size=16, num_hidden_layers=2, d_state=2, num_labels=5),
}
