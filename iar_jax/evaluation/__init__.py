"""Sample-quality evaluation: ADM-protocol FID / sFID / IS / precision-recall and a small-CNN FID."""
