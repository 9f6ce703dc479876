"""``python -m wsdeploy``: the ``wsdeploy`` command."""

from wsdeploy.cli import main

main(prog_name="wsdeploy")
