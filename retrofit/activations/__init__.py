"""The activations: functional forms, eager autograd kernels, nn.Modules and the registry that builds one from a config. They import nothing of the project but its config."""
