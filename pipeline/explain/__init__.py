"""Explaining: the CAM family, the explainer that runs a model with hooks, layer layouts, upsampling, per-clip
statistics and faithfulness maths. Pure torch, batched, no I/O."""
