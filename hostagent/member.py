"""What every member of a job does with incd, whatever its part (an allreduce
rank, a parameter server, a mapper or a reducer): register over the control
connection with the control-API version, then keep it (heartbeats; events:
a failed job, and whatever the member handles itself), maybe rejoin a
restarted incd, and leave with "done" so the others do not take it for
crashed."""
from __future__ import annotations

import queue

from bpf import control

from .incd_link import REJOIN_S, Control, TransportError, connect_incd, job_token, shared_key
from .xdp_path import XdpUnavailable, route_to


class Member:
    """One member's control connection. error: the exception class its
    refusals of bad arguments raise (TransportError or a subclass)."""

    def __init__(self, job: int, fail_timeout: float, error: type[TransportError] = TransportError):
        try:
            control.check_fail_timeout(fail_timeout, 'fail_timeout')
        except control.LimitError as e:
            raise error(str(e)) from None
        self.job = job
        self.fail_timeout = fail_timeout
        self.failure: str | None = None  # why the job failed, as incd said
        self.ctl: Control | None = None

    def register(self, switch: str | None, ctrl_port: int, register_timeout: float, req: dict) -> dict:
        """Connects to incd and registers (req: the "register" request's other
        fields); returns incd's reply once every member is in."""
        self.ctl = Control(connect_incd(switch, ctrl_port), shared_key())
        self.ctl.sock.settimeout(register_timeout + 10)
        self.ctl.authenticate()
        token = job_token()
        return self.ctl.call({"op": "register", "version": control.CONTROL_VERSION, **req,
                              **({"job_token": token} if token else {})})

    def abort(self, why: str) -> TransportError:
        """Fails the job with this member's own reason (the others learn it at
        once) and returns the error to raise here."""
        try:
            self.ctl.call({"op": "abort", "error": why})
        except Exception:
            pass  # the connection closing fails the job anyway
        return TransportError(why)

    def give_up(self, why: str) -> None:
        """Once running: fails the job with this member's reason (no reply awaited)."""
        if self.ctl is not None and self.ctl.lost_at is None:
            self.ctl.send({"op": "abort", "error": why})

    def check_mtu(self, toward: str, packet_bytes: int) -> None:
        """This host's interface towards the switch must carry the job's
        largest datagram (a smaller one would fragment it, and the switch drops
        fragments): if not, the job fails now, naming the interface and sizes."""
        try:
            dev = route_to(toward)
            with open(f"/sys/class/net/{dev}/mtu") as f:
                mtu = int(f.read())
        except (OSError, ValueError, XdpUnavailable):
            return  # no route or no sysfs: nothing to compare with
        if mtu < packet_bytes:
            raise self.abort(f"job {self.job}: this host's interface {dev} has MTU {mtu}, smaller than the "
                             f"job's {packet_bytes}-byte packets (sized by the switch ports' MTU); raise it "
                             f"to {packet_bytes} or lower the switch ports' MTU")

    def start(self, rejoin=None) -> None:
        """Starts reading events and sending heartbeats. rejoin: a function
        giving the "rejoin" request, to go back to a restarted incd after a
        lost connection (for up to REJOIN_S)."""
        if rejoin is not None:
            self.ctl.rejoin_on_loss(rejoin, REJOIN_S)
        self.ctl.start(self._event, self.fail_timeout)

    def _event(self, ev: dict) -> None:
        if ev.get("event") == "job_failed":
            self.on_job_failed(ev)
        else:
            self.on_event(ev)

    def on_job_failed(self, ev: dict) -> None:
        if self.failure is None:
            self.failure = f"job {ev.get('job', self.job)} failed: {ev.get('error') or 'no reason given'}"

    def on_event(self, ev: dict) -> None:
        """Any other event; a member that takes part in one overrides this."""

    @property
    def ctrl_lost(self) -> bool:
        return self.ctl is not None and self.ctl.lost_at is not None

    def leave(self) -> None:
        """Says "done" to incd (it frees the job once all members are) and waits
        for its reply. A member that leaves without this is taken for crashed."""
        if self.ctrl_lost:
            return
        self.ctl.send({"op": "done"})
        try:
            self.ctl.replies.get(timeout=5)
        except queue.Empty:
            pass

    def close(self) -> None:
        if self.ctl is not None:
            self.ctl.close()
