"""A DNS server for tests: dnspython messages over UDP on 127.0.0.1, answering A queries from a
dict the test changes (a name's records as a headless Service's would be)."""

from __future__ import annotations

import socket
import threading

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


class DnsServer:
    """Answers A queries for `names` (name -> addresses, changed by the test) over UDP on
    127.0.0.1; other names get NXDOMAIN, other types an empty answer. TTL 1 s. A name is looked
    up without the trailing dot, as written (`decode.test`)."""

    def __init__(self) -> None:
        self.names: dict[str, list[str]] = {}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.queries = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:  # closed
                return
            query = dns.message.from_wire(data)
            response = dns.message.make_response(query)
            response.flags |= dns.flags.AA
            question = query.question[0]
            name = question.name.to_text().rstrip(".")
            self.queries += 1
            if name not in self.names:
                response.set_rcode(dns.rcode.NXDOMAIN)
            elif question.rdtype == dns.rdatatype.A and self.names[name]:
                response.answer.append(dns.rrset.from_text(question.name, 1, "IN", "A", *self.names[name]))
            self.sock.sendto(response.to_wire(), peer)

    def close(self) -> None:
        self.sock.close()
