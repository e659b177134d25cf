"""Dense prediction: necks, detection heads, COCO evaluation."""
