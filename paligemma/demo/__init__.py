"""A tiny bundled demo: a procedural "shapes world" and the small PaliGemma trained on it.

`paligemma.demo.scenes` draws the images and writes the ground-truth answers for PaliGemma's task
prompts (caption, detect, counting and colour questions). It needs numpy and Pillow only.
"""
