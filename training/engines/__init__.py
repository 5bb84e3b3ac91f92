"""Engine implementations of training.engine.Engine, one module per kind."""
