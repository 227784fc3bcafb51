"""dm-audit: find and fix bad labels with derivative manipulation."""
