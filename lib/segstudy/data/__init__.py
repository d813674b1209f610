"""Stage 1, data: the label set, the Cityscapes and BDD100K readers, transforms, datasets and
loaders, and the generated street-scene dataset."""
