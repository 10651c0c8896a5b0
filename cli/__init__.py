"""The ``jaxedit`` command line: a thin skin over the jaxedit Python API (installed as ``jaxedit.cli``)."""
