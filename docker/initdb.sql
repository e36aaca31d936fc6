-- First start of the PostgreSQL container: the three databases of the stack.
CREATE DATABASE airflow;
CREATE DATABASE mlflow;
CREATE DATABASE mlflow_auth;
