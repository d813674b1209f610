"""The generated street-scene datasets: scene.py draws a scene, layouts.py writes one image in a
dataset's layout, dataset.py writes the whole set."""
