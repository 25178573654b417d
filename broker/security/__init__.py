"""Who is calling (the client certificate's identity) and the server's own TLS material."""
