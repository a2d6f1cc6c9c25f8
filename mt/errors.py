"""The errors a user can cause (a bad file, flag, directory or run state), as opposed to bugs.

Every command ends through `mt.dist.run`, which prints a UserError as one paragraph,
`error: <where>: <what is wrong>. Fix: <what to change>`, and exits with status 2; a bug keeps its
traceback. `MT_DEBUG=1` shows the traceback of a user error too.
"""


class UserError(ValueError):
    """Something the user can fix; the message says where, what, and what to change."""
