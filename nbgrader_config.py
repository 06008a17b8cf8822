# nbgrader reads this file from the current directory (nbgrader CLI, formgrader). The settings live in
# autograder/config.py so that the kit's own commands use exactly the same ones.
from autograder.config import course_config

c = get_config()  # noqa: F821 (provided by nbgrader)
c.merge(course_config())
