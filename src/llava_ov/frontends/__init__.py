"""Front ends over the runtime: terminal, page, server, batch, compress; none imports another."""
