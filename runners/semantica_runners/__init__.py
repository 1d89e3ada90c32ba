"""Built-in Semantica runner plugins, registered under the `semantica.runners` entry points."""
