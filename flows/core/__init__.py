"""The pure ML core: params, data, model, training and evaluation.

Nothing here imports Prefect or Textual, so the core runs alone on a GPU box that has only
torch and timm, and its tests need no server.
"""
