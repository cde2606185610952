"""The Perfusion method on a diffusers pipeline (torch): the gated rank-1 edit, the attention
processor, training, concept files, C⁻¹ and rendering. Imports `files`, never `build`."""
