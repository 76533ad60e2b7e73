"""The HTTP interface: Starlette routes, msgspec bodies, no business rules of its own."""
