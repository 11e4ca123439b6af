"""Generated gRPC code for the rigshift.v1 API (see protos/). Do not edit."""
