"""Genre models: the classifiers, training and cross-validation, evaluation, the model registry."""
