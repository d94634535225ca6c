def main():
    print("sdtune")
