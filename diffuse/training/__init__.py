"""The Trainer and its loop, shared by diffuse train (and, later, distillation)."""
