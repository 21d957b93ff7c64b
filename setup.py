"""Packaging: metadata lives in setup.cfg; this file adds the twistd plugin.

The plugin module sits in the ``twisted.plugins`` namespace, which is not a
package of ours, so it is installed as a plain module path beside the real
Twisted plugins.
"""

from setuptools import setup

setup(
    py_modules=["twisted.plugins.runner_gateway_plugin"],
)
