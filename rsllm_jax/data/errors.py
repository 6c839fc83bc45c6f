"""The one exception type the data layer raises for bad input."""


class DataError(ValueError):
    """Bad or unexpected input data; the message names the file, row or field."""

    def __init__(self, path, problem, row=None):
        self.path = str(path)
        self.row = row
        self.problem = problem
        where = self.path if row is None else f"{self.path}, {row}"
        super().__init__(f"{where}: {problem}")
