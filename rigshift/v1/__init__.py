"""Generated from protos/rigshift/v1 by `make proto`. Do not edit."""
